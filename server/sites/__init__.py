"""The sites as the coordinator reaches them: who each node is, and messages to all of them."""
