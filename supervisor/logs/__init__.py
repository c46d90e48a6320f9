"""The daemon's own log output: journald-native entries or timestamped lines."""
