"""Builders of bad inputs, generated into temp dirs at test time (no binaries committed)."""
