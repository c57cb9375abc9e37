# A package, so that its conftest is imported as gpu.conftest: as a bare "conftest" it would replace tests/conftest.py
# in sys.modules, which the suite's modules import from (`from conftest import BACKENDS`).
