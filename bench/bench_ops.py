"""Op-level benchmarks (see invconv.benchmarks); the same as ``invconv bench``."""
from invconv.benchmarks import main

if __name__ == "__main__":
    main()
