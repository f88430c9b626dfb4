"""What keeps long runs alive: exact resume, preemption, atomic checkpoints, numerical guards (docs/reliability.md)."""
