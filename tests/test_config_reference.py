"""The README's config reference is regenerated from configs/*.py and must be current."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_config_reference_is_current():
  proc = subprocess.run([sys.executable, "scripts/config_reference.py", "--check"], cwd=REPO,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_config_field_is_documented():
  sys.path.insert(0, os.path.join(REPO, "scripts"))
  import config_reference
  from configs import recsys
  table = config_reference.config_table(os.path.join(REPO, "configs", "recsys.py"))
  config = recsys.get_config()

  def leaves(node, prefix=""):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if hasattr(value, "items"):
        yield from leaves(value, name + ".")
      else:
        yield name

  missing = [name for name in leaves(config) if f"| `{name}` |" not in table]
  assert not missing, f"fields without a commented line in configs/recsys.py: {missing}"
