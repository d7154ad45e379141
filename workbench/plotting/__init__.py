"""Figures: functions that take arrays and return or update matplotlib artists (no torch here)."""
