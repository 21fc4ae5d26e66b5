"""A student's widths, and how a narrower student takes its weights from the teacher.

`StudentShape`: hidden size, attention heads (and so the head size) and feed-forward width.
Unset in the config, each is the teacher's; a student narrower than its teacher (e.g. 6 x 384
with 12 heads from a 12 x 768 bert-base) is initialised by weight selection (Xu et al. 2024,
"Initializing Models with Larger Ones"): every tensor of the teacher keeps the same subset of
its indices along every axis that is narrower in the student --

- the hidden axis: evenly spaced teacher heads, and within each of them evenly spaced
  dimensions, in head-major order, so that the student's residual stream is a subset of the
  teacher's coordinates and its attention heads are some of the teacher's heads, cut to the
  student's head size (plain evenly spaced dimensions when the student has more heads than
  the teacher);
- the feed-forward axis: evenly spaced units.

The same hidden index set maps a student's hidden state back into the teacher's space: the
learned projection of hidden-state losses starts as that embedding (`projection_init`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distil.errors import UserError


@dataclass(frozen=True)
class StudentShape:
    hidden: int
    heads: int
    intermediate: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def of(cls, config) -> "StudentShape":
        """The widths of a transformers config (BERT-family names, or DistilBERT's)."""
        if hasattr(config, "dim") and hasattr(config, "n_heads"):
            return cls(config.dim, config.n_heads, config.hidden_dim)
        return cls(config.hidden_size, config.num_attention_heads, config.intermediate_size)

    @classmethod
    def for_student(cls, student, tconfig) -> "StudentShape":
        """The student's widths from its config section (`student.*`), unset ones taken from
        the teacher (the feed-forward width scaled with the hidden size); refuses a shape that
        cannot be built or initialised from this teacher."""
        t = cls.of(tconfig)
        hidden = student.hidden_size or t.hidden
        heads = student.num_attention_heads or t.heads
        intermediate = student.intermediate_size or t.intermediate * hidden // t.hidden
        if hidden > t.hidden or intermediate > t.intermediate:
            raise UserError(
                f"the student ({hidden} wide, feed-forward {intermediate}) is wider than its teacher ({t.hidden}, "
                f"{t.intermediate})",
                where="student.hidden_size",
                fix=f"use at most the teacher's widths: hidden_size <= {t.hidden}, intermediate_size <= {t.intermediate}",
            )
        if hidden % heads:
            raise UserError(
                f"{heads} attention heads do not divide the student's hidden size {hidden}",
                where="student.num_attention_heads",
                fix="choose a head count that divides hidden_size",
            )
        return cls(hidden, heads, intermediate)


def even(n_from: int, n_to: int) -> list[int]:
    """n_to of range(n_from), evenly spaced (each the middle of its share); all of them when equal."""
    return [int((i + 0.5) * n_from / n_to) for i in range(n_to)]


class Selection:
    """Cuts teacher tensors to a student's shape by weight selection (see the module's docstring)."""

    def __init__(self, teacher: StudentShape, student: StudentShape):
        self.teacher, self.student = teacher, student
        if student.heads <= teacher.heads and student.head_dim <= teacher.head_dim:
            dims = even(teacher.head_dim, student.head_dim)
            self.hidden = [h * teacher.head_dim + d for h in even(teacher.heads, student.heads) for d in dims]
        else:
            self.hidden = even(teacher.hidden, student.hidden)
        self.intermediate = even(teacher.intermediate, student.intermediate)

    def __call__(self, tensor: torch.Tensor, shape: torch.Size, key: str = "") -> torch.Tensor:
        """`tensor` (the teacher's) cut to `shape` (the student's) along each axis that differs."""
        if tuple(tensor.shape) == tuple(shape):
            return tensor
        if tensor.dim() != len(shape):
            raise RuntimeError(
                f"{key}: the teacher's {tuple(tensor.shape)} and the student's {tuple(shape)} differ in rank"
            )
        t, s = self.teacher, self.student
        for axis, (a, b) in enumerate(zip(tensor.shape, shape)):
            if a == b:
                continue
            if (a, b) == (t.hidden, s.hidden):
                index = self.hidden
            elif (a, b) == (t.intermediate, s.intermediate):
                index = self.intermediate
            else:
                raise RuntimeError(
                    f"{key}: axis {axis} of {a} cannot be cut to {b} (neither the hidden nor the feed-forward width)"
                )
            tensor = tensor.index_select(axis, torch.tensor(index, device=tensor.device))
        return tensor.contiguous()

    def projection_init(self) -> torch.Tensor:
        """[teacher hidden, student hidden]: student dimension j sits at teacher dimension hidden[j]."""
        w = torch.zeros(self.teacher.hidden, self.student.hidden)
        w[self.hidden, torch.arange(self.student.hidden)] = 1.0
        return w
