"""The search server (`umarvel serve`)."""
