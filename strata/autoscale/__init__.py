"""Autoscaling on what LLM requests cost: the policy (replicas from the token backlog in
seconds of work), and a simulator that replays a trace against modelled replicas to compare
it with CPU- and queue-based policies."""
