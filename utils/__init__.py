"""Data, model loading, reporting and the small command-line tools around them."""
