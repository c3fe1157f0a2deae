"""Converters from public benchmark data sets to the behaviour-log schema."""
