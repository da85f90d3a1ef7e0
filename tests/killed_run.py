"""`dpg train CONFIG`, killed by SIGKILL at a chosen moment of a chosen step (for
tests/test_safety.py): `python tests/killed_run.py generation|reward STEP CONFIG`.

generation: in the middle of sampling step STEP's completions (its third decoding forward).
reward:     in the middle of step STEP's reward, after the target's inner run and before
            the metagradient's reverse sweep.
SIGKILL leaves no chance to clean up: what is on disk is what a crash leaves.
"""

import os
import signal
import sys

from transformers import GenerationMixin

import dpg.rewards
from dpg.cli import main


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_generation(step: int) -> None:
    real, calls = GenerationMixin.generate, [0]

    def generate(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == step:  # one generate call per generated batch
            forward, passes = self.forward, [0]

            def dying_forward(*a, **k):
                passes[0] += 1
                if passes[0] == 3:
                    die()
                return forward(*a, **k)

            self.forward = dying_forward
        return real(self, *args, **kwargs)

    GenerationMixin.generate = generate


def kill_in_reward(step: int) -> None:
    real, calls = dpg.rewards.example_metagrads, [0]

    def example_metagrads(*args, on_trained=None, **kwargs):
        calls[0] += 1

        def trained(params):
            if on_trained is not None:
                on_trained(params)
            if calls[0] == step:  # one inner run per generated batch (cross-group batching)
                die()

        return real(*args, on_trained=trained, **kwargs)

    dpg.rewards.example_metagrads = example_metagrads


if __name__ == "__main__":
    moment, step, config = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    {"generation": kill_in_generation, "reward": kill_in_reward}[moment](step)
    sys.exit(main(["train", config]))
