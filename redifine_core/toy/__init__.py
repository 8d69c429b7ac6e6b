"""The toy lab: a procedurally generated captioned image set and a small text-to-image model trained on it."""
