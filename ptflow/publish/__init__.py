"""After training: the evaluate stage, loss plots, the model card, pushing to the Hub, and UI reports."""
