"""A Flower app: federated zeroth-order fine-tuning of the packaged MiniLM's head on the packaged tweets."""
