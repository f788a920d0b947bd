"""An example user project for relayrl: one-step word problems for SmolLM2-135M-Instruct, with its own data,
reward functions (`rewards`) and environment (`envs`). A package, so its modules are named by import path from
the repository root (``examples.word_problems.rewards:correct``) and reach other nodes together
(docs/bring_your_own_task.md)."""
