"""Plugins about how training processes are launched (the launch guard)."""
