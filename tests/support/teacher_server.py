"""Moved to `serve/fake_teacher.py` (benchmarks use it too, and may not import `tests/`)."""

from serve.fake_teacher import *  # noqa: F403
from serve.fake_teacher import FaultPlan, TeacherServer, main  # noqa: F401
