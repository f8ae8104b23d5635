import sys
from pathlib import Path

# shared helpers (tolerances.py, ops/inputs.py) import by bare name
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent / "ops"))
