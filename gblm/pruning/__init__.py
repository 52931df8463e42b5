"""Pruning methods: one interface, one mask-selection module, one class per method."""
