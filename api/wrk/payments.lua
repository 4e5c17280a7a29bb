-- wrk's script for `upi-engine bench` (api/bench.py): a closed loop that sends each payment
-- of a file exactly once, then stops.
--
--   wrk -t T -c C -d D --timeout 60s -s payments.lua URL -- REQUESTS_FILE T API_KEY
--
-- REQUESTS_FILE has one payment a line, "<merchant_order_id>\t<JSON body>"; the order id is
-- also the request's Idempotency-Key, and every line has its own payer. Thread k (its id
-- set in setup()) sends lines k, k+T, k+2T, ... in order, from its own counter.
--
-- wrk runs for a duration, not a count, so each thread hands out its share through delay()
-- (called before every request of a connection): once the share is handed out, a
-- connection is parked for an hour instead of sending. When a thread has its share's
-- answers it writes "thread-done" to stderr and stops; the bench interrupts wrk (SIGINT)
-- once every thread is done, and done() prints one JSON line on stdout.
--
-- Latencies are measured here, from the request being handed to wrk until its answer
-- (paired by the merchant_order_id that every 202 carries): wrk 4.1's own histogram is
-- "corrected" at the end with synthetic samples derived from the run's mean interval,
-- which is not the latency a client saw.

local ffi = require("ffi")
ffi.cdef([[
typedef struct { long tv_sec; long tv_nsec; } upi_bench_timespec;
int clock_gettime(int clock_id, upi_bench_timespec *tp);
]])
local CLOCK_MONOTONIC = 1 -- Linux; the same clock as Python's time.monotonic()
local ts = ffi.new("upi_bench_timespec")

local function now_us()
    ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
    return tonumber(ts.tv_sec) * 1000000 + tonumber(ts.tv_nsec) / 1000
end

local PARK_MS = 3600 * 1000

-- The main state: one entry per thread, for done().
local threads = {}

function setup(thread)
    thread:set("id", #threads)
    table.insert(threads, thread)
end

function init(args)
    -- args[0] is the URL, then the arguments after "--"
    local path, nthreads, api_key = args[1], tonumber(args[2]), args[3]
    requests, orders = {}, {}
    local line_no = 0
    for line in io.lines(path) do
        if line_no % nthreads == id then
            local order_id, body = line:match("^([^\t]+)\t(.+)$")
            local headers = {
                ["Authorization"] = "Bearer " .. api_key,
                ["Idempotency-Key"] = order_id,
                ["Content-Type"] = "application/json",
            }
            table.insert(requests, wrk.format("POST", "/v1/payments", headers, body))
            table.insert(orders, order_id)
        end
        line_no = line_no + 1
    end
    share = #requests
    handed_out, issued, answered, unpaired = 0, 0, 0, 0
    first_send_us, last_answer_us = 0, 0
    sent_at, latencies_us, statuses = {}, {}, {}
    -- wrk calls request() once in thread 0 before the run, to check the script; that
    -- request is never sent and must not use up a payment.
    checked = id ~= 0
end

function delay()
    if handed_out >= share then
        return PARK_MS
    end
    handed_out = handed_out + 1
    return 0
end

function request()
    if not checked then
        checked = true
        return requests[1]
    end
    -- Past the share only if wrk re-sends after a broken connection (it then calls
    -- request() without delay()): the last payment again, same key, never a new one.
    issued = issued + 1
    local i = math.min(issued, share)
    local now = now_us()
    if first_send_us == 0 then
        first_send_us = now
    end
    sent_at[orders[i]] = now
    return requests[i]
end

function response(status, headers, body)
    local now = now_us()
    last_answer_us = now
    answered = answered + 1
    statuses[status] = (statuses[status] or 0) + 1
    if status == 202 then
        local order_id = body:match('"merchant_order_id"%s*:%s*"([^"]+)"')
        local began = order_id and sent_at[order_id]
        if began then
            table.insert(latencies_us, now - began)
            sent_at[order_id] = nil
        else
            unpaired = unpaired + 1 -- a 202 whose latency could not be measured
        end
    end
    if answered >= share then
        io.stderr:write("thread-done\n")
        io.stderr:flush()
        wrk.thread:stop()
    end
end

-- The q quantile (0..1) of sorted values by linear interpolation, as api.loadgen.percentile.
local function quantile(sorted, q)
    local n = #sorted
    if n == 0 then
        return 0
    end
    local at = (n - 1) * q
    local low = math.floor(at)
    local high = math.min(low + 1, n - 1)
    return sorted[low + 1] + (sorted[high + 1] - sorted[low + 1]) * (at - low)
end

function done(summary, latency, requests_per_s)
    local all, by_status = {}, {}
    local issued_total, answered_total, unpaired_total = 0, 0, 0
    local first, last = 0, 0
    for _, thread in ipairs(threads) do
        for _, v in ipairs(thread:get("latencies_us")) do
            table.insert(all, v)
        end
        for status, n in pairs(thread:get("statuses")) do
            by_status[status] = (by_status[status] or 0) + n
        end
        issued_total = issued_total + thread:get("issued")
        answered_total = answered_total + thread:get("answered")
        unpaired_total = unpaired_total + thread:get("unpaired")
        local f, l = thread:get("first_send_us"), thread:get("last_answer_us")
        if f > 0 and (first == 0 or f < first) then
            first = f
        end
        last = math.max(last, l)
    end
    table.sort(all)
    local statuses_json = {}
    for status, n in pairs(by_status) do
        table.insert(statuses_json, string.format('"%d":%d', status, n))
    end
    local e = summary.errors
    io.write(string.format(
        '{"requests":%d,"issued":%d,"answered":%d,"unpaired":%d,"statuses":{%s},'
            .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
            .. '"first_send_us":%.0f,"last_answer_us":%.0f,"latency_count":%d,'
            .. '"latency_ms":{"p50":%.3f,"p90":%.3f,"p99":%.3f,"max":%.3f}}\n',
        summary.requests, issued_total, answered_total, unpaired_total,
        table.concat(statuses_json, ","),
        e.connect, e.read, e.write, e.status, e.timeout,
        first, last, #all,
        quantile(all, 0.5) / 1000, quantile(all, 0.9) / 1000, quantile(all, 0.99) / 1000,
        (all[#all] or 0) / 1000
    ))
end
