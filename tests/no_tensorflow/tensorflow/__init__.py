"""Put first on ``PYTHONPATH`` of the console scripts the tests start (``cli_helpers.ENV``): there
``import tensorflow`` fails, as on an install without the [prepare] extra. TensorFlow is installed
for ``vtab-prepare``'s tests only, and Lightning's default TensorBoard logger would import it in
every run (about 4 s of each process's start)."""

raise ImportError("TensorFlow is hidden from this test process (tests/no_tensorflow); vtab-prepare tests show it.")
