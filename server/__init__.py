"""The blocksketch HTTP query service."""
