"""Everything customfit takes from Keras beyond its public API, in one place.

- `internals`: the private Keras symbols customfit uses, one function each,
  adapted where the tested releases differ;
- `step_function`: Keras' `_make_function`, copied and extended;
- `versions`: the tested Keras and TensorFlow releases, the hash of every
  Keras function customfit copies or re-implements, and the warning given
  when the installed ones differ.

`tests/test_keras_internals.py` probes each assumption on the installed Keras.
"""
