"""smearscope: a point-of-care blood-smear analyzer (microscope frames in, reports out over MQTT).

One installed package. `device`, `engines`, `export` and `service` live in the repository's
top-level folders of the same names and are mapped under this namespace at install time
(pyproject.toml `package-dir`); the command line is `smearscope.cli`.
"""
