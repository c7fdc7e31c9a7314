"""Dual routing: router two picks each chosen expert's width per token; tiers steer it per request."""
