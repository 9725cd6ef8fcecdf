"""Access control: which identity may do what to which secret names (DESIGN.md §6).

Pure decisions over a parsed policy; the service authenticates the caller, asks `Policy.allows`
(or `Policy.decide`, whose reason goes to the audit log) and filters list results with
`Policy.filter_names`, and batch get by prefix and watch with `Policy.enumerable_by_read`.
"""

from secrets_manager.access.policy import Capability, Decision, Policy, Role, Rule, load_policy

__all__ = ["Capability", "Decision", "Policy", "Role", "Rule", "load_policy"]
