"""The hub: fans committed session events out to watchers, each through its own bounded buffer."""
