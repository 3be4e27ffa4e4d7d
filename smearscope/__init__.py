"""smearscope: a point-of-care blood-smear analyzer (microscope frames in, reports out over MQTT).

One installed package. `device`, `engines`, `export` and `service` live in the repository's
top-level folders of the same names and are mapped under this namespace at install time
(pyproject.toml `package-dir`); the command line is `smearscope.cli`; `smearscope.files` writes
files whole or not at all for `export` and `service`, which may not import each other.
"""
