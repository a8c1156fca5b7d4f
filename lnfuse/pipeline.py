"""Pass infrastructure: a pass takes the model graph and returns ``(model, modified)``.

Passes run in the explicit order of :data:`lnfuse.passes.DEFAULT_PASSES`; nothing
registers itself on import. Each pass snapshots its candidates from the op-type
index, checks and (optionally) proves each one, schedules the rewrites and
commits them once at the end, so a pass costs one linear sweep over the graph
however many matches it makes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from lnfuse.graph import ModelGraph, node_label
from lnfuse.matcher import Candidate, Refusal
from lnfuse.precision import Rounding, removed_rounding
from lnfuse.report import MatchRecord, RefusalRecord, Report
from lnfuse.rules import AnchorNote, NormParams, NormRule, undoing_transpose
from lnfuse.symbolic import Flag


class PassResult(NamedTuple):
    model: ModelGraph
    modified: bool


@dataclass
class PassContext:
    """Options and shared state for one optimize run."""

    report: Report
    verify: bool = True
    rmsnorm: bool = False
    hoist: bool = True
    allow_transpose: bool = True
    emit_ok: dict[str, str | None] = field(
        default_factory=dict
    )  # op -> None if it may be emitted, else why not
    prover: object | None = None
    anchor_notes: dict[str, str] = field(default_factory=dict)  # anchor label -> why nothing was found


class Pass(Protocol):
    name: str
    description: str
    # (op, opset it needs) when the pass emits a default-domain op the model may not have yet:
    # optimize() decides up front whether that opset can be reached exactly.
    emits: tuple[str, int] | None

    def enabled(self, ctx: PassContext) -> bool: ...

    def __call__(self, mg: ModelGraph, ctx: PassContext) -> PassResult: ...


class NormPass:
    """Shared body of the LayerNormalization and RMSNormalization passes."""

    name = "norm"
    description = ""
    rule: NormRule

    @property
    def emits(self) -> tuple[str, int]:
        return self.rule.op, self.rule.min_opset

    def enabled(self, ctx: PassContext) -> bool:
        return True

    def __call__(self, mg: ModelGraph, ctx: PassContext) -> PassResult:
        # Phase 1: check and prove each candidate as the walk finds it, while the graph is still
        # untouched (a group of candidates shares nodes; rewriting one first would break the
        # others' proofs). Only the accepted ones are kept, so memory does not hold every
        # candidate of a large model at once. Check and proof refusals are reported after the
        # walk's own, in candidate order.
        accepted: list[tuple[Candidate, NormParams, MatchRecord]] = []
        refused: list[RefusalRecord] = []
        failed_groups: set[int] = set()
        for item in self.rule.pattern(mg):
            if isinstance(item, Refusal):
                ctx.report.refusals.append(_refusal(item, self.name))
            elif isinstance(item, AnchorNote):
                ctx.anchor_notes.setdefault(item.anchor, item.reason)
            else:
                kept = self._try_candidate(mg, ctx, item)
                if isinstance(kept, RefusalRecord):
                    refused.append(kept)
                    if item.group is not None:
                        failed_groups.add(item.group)
                elif kept is not None:
                    accepted.append(kept)
        ctx.report.refusals.extend(refused)
        # Phase 2: rewrite (a group all together, or not at all).
        modified = self._rewrite_all(mg, ctx, accepted, failed_groups)
        if modified:
            mg.commit()
        return PassResult(mg, modified)

    def _try_candidate(
        self, mg: ModelGraph, ctx: PassContext, cand: Candidate
    ) -> tuple[Candidate, NormParams, MatchRecord] | RefusalRecord | None:
        """The plan for one candidate, its refusal (check or proof), or None when the op may not
        be emitted (reported as found, not rewritten)."""
        rule = self.rule
        params = rule.check(mg, cand, allow_transpose=ctx.allow_transpose)
        if isinstance(params, Refusal):
            return _refusal(params, self.name)
        record = _record(mg, rule, cand, params)
        if ctx.emit_ok.get(rule.op) is not None:
            ctx.report.found_not_rewritten.append(record)
            return None
        if ctx.verify and ctx.prover is not None:
            why = ctx.prover.prove(mg, rule, cand, params)  # type: ignore[attr-defined]
            if why is not None:
                return RefusalRecord(why, record.nodes, node_label(cand.nodes[-1]), cand.view.path, self.name)
        return (*rule.settled(cand, params), record)

    def _rewrite_all(
        self,
        mg: ModelGraph,
        ctx: PassContext,
        accepted: list[tuple[Candidate, NormParams, MatchRecord]],
        failed_groups: set[int],
    ) -> bool:
        """Schedule every accepted rewrite (a group whose member was refused is refused whole)."""
        modified = False
        removed: list[str] = []
        for cand, params, record in accepted:
            if cand.group is not None and cand.group in failed_groups:
                ctx.report.refusals.append(
                    RefusalRecord(
                        "shares its statistics with a norm that was refused",
                        record.nodes,
                        node_label(cand.nodes[-1]),
                        cand.view.path,
                        self.name,
                    )
                )
                continue
            self.rule.rewrite(mg, cand, params)
            removed += [
                f"{f.split('_')[0]} at '{record.output}'" for f in record.flags if f in _ROUNDING_FLAGS
            ]
            ctx.report.matches.append(record)
            if Flag.FP16_OVERFLOW_PRONE in params.flags:
                ctx.report.warnings.append(
                    f"decomposed fp16 norm at '{cand.output.name}' overflows for |x - mean| > ~256; "
                    "the fused op keeps fp32 statistics (stash_type=1)"
                )
            modified = True
        if removed:
            ctx.report.warnings.append(_rounding_warning(removed))
        return modified


_ROUNDING_FLAGS = frozenset(r.value for r in Rounding)


def _rounding_warning(where: list[str]) -> str:
    """One line for the pass: which norms lost a 16-bit rounding inside them."""
    more = f" and {len(where) - 1} more" if len(where) > 1 else ""
    return (
        f"16-bit rounding inside {len(where)} norm(s) removed ({where[0]}{more}): the original casts "
        "down and back inside the norm; the fused op rounds once, at its output, so `lnfuse check` "
        "compares outputs downstream at the 16-bit type's tolerance"
    )


def _refusal(r: Refusal, pass_name: str) -> RefusalRecord:
    return RefusalRecord(r.reason, tuple(r.nodes), r.anchor, r.graph, pass_name)


def _record(mg: ModelGraph, rule: NormRule, cand: Candidate, p: NormParams) -> MatchRecord:
    final, ext = p.extent.final, p.extent
    flags = set(p.flags)
    rounding = removed_rounding((*ext.prefix, *cand.nodes, *ext.suffix), mg.dtype, final)
    if rounding is not None:
        flags.add(rounding[0].value)
    added = []
    if p.perm is not None:
        out = final
        # A Transpose by the same perm after the match cancels the one back (see rules.rewrite).
        added += ["Transpose"] if undoing_transpose(mg, out, p) is not None else ["Transpose", "Transpose"]
    if p.out_cast is not None:
        added.append("Cast")
    return MatchRecord(
        op=p.op,
        pattern=p.pattern,
        graph=cand.view.path,
        output=final.name,
        input=rule.input_of(mg, cand, p).name,
        nodes=tuple(node_label(n) for n in (*ext.prefix, *cand.nodes, *ext.suffix)),
        epsilon=p.epsilon,
        axis=p.axis,
        stash_type=p.stash_type,
        normalized_shape=p.normalized_shape,
        flags=tuple(sorted(flags)),
        scale=p.scale_source,
        bias=p.bias_source,
        added=tuple(added),
    )
