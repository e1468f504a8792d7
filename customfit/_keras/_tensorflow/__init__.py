"""Keras' TensorFlow trainer, as customfit uses it (`step_function`: Keras'
`_make_function`, copied and extended)."""
