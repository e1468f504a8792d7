"""`python -m customfit check`: compares CustomModel with stock `fit` on this
install and prints what matches bit for bit."""

import sys

USAGE = """usage: python -m customfit check

Trains small models with CustomModel and with stock keras.Model on this
install (its Keras, TensorFlow and processor or GPU) and prints what matches
bit for bit: the default step, a Keras-2 train_step, self.log,
steps_per_execution and every batch's logs. Exit status 0 when all match."""


def main(argv: list[str]) -> int:
    if argv != ["check"]:
        print(USAGE, file=sys.stderr)
        return 0 if argv in (["-h"], ["--help"]) else 2
    from customfit import _check

    return _check.main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
