"""pytest setup shared by every test file: the repository root goes on sys.path (the method scripts, `common`, and
`tests.helpers` import from there) and benchmark/ at its end (tests of the benchmark scripts import them by name;
last, so a script named like a standard module, benchmark/trace.py, does not shadow it).

    tests/helpers/   what tests build or read, no tests: tiny_sd3 (a tiny random SD3 pipeline), tiny_rewards (tiny
                     real reward models), cli_check (a method's argument checks in-process), run_logs (logged scalars,
                     the first iteration's inputs), reward_server (a fake Flow-GRPO / GenEval reward server),
                     prewarmed (`python script.py` in a child forked after the imports: ~5 s less per script run),
                     learning (the learning tests' train-prompt evaluation and gains)
    tests/test_<method>.py                one per method script, the same sections in each
    tests/test_<module>.py                one per common/ module (models, sampling, evaluate, utils, rewards, world,
                                          prompts), and the cross-cutting paths (sd3_path, cuda_path, reliability, hub)
"""

import os
import sys
from pathlib import Path

# fp32 on every CPU unless asked (CLEANFLOW_CPU_BF16=1): the learning tests' margins were measured in fp32, and a CI
# CPU with native bf16 would otherwise run them in bf16 (common.models.default_dtype); subprocesses inherit it
os.environ.setdefault("CLEANFLOW_CPU_BF16", "0")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "benchmark") not in sys.path:
    sys.path.append(str(ROOT / "benchmark"))

# the leaves register with the core (the embedded world, the real rewards, --upload-model), as the method scripts do
import common.reward_models  # noqa: E402,F401
import common.tools.hub  # noqa: E402,F401
import common.world  # noqa: E402,F401
