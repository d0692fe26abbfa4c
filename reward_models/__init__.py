"""Reward models: rule-based scorers (rules.py) and the reward service around them."""
