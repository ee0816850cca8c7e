"""capsbench: a benchmarking and robustness harness for Capsule Networks.

Importing the package does no work: no network, disk or GPU access happens until a
command or function asks for it.
"""

__version__ = "0.1.0"
