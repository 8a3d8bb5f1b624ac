"""Models outside the federation: public pretraining, non-private training with selection."""
