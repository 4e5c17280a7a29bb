"""Fraud context: four scorers (velocity, location, device, a scikit-learn model) and the
combiner that turns them into one decision. ``features`` is the one feature code used both
to train the model (on ``simulator`` traffic) and to score live payments."""
