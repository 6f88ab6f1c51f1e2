"""Agentic GRPO: multi-turn rollouts in which the policy calls tools (each run by a command) or
plays episodes of an environment (one process speaking JSON lines), trained only on what the
model wrote.

- tools.py: tool sets (a tools file, --tool NAME=COMMAND) and running a call;
- commands.py: one command run with a deadline, an output cap, its own process group;
- environment.py: the environment process and its protocol;
- turns.py: reading a turn (the template's tool-call parser, as serve) and writing what follows;
- rollout.py: episodes, turn after turn, with the mask of the model's own tokens; metrics;
- trainer.py: the rollout as TRL GRPOTrainer's rollout_func, the environment's reward term.
"""
