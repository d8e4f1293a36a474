"""What the taskbox MCP server tells every client in its ``initialize`` answer (a light module:
the fast start-up path and the SDK server both read it)."""

INSTRUCTIONS = """\
taskbox gives each coding task its own persistent Docker sandbox, git branch and memory.
Typical flow: create_task_sandbox (or resume one) -> attach_agent_to_task (restores todos and
history) -> work with execute_in_task and the *_task_file tools -> keep update_task_todos and
log_task_decision current -> create_task_checkpoint before risky steps -> detach_agent_from_task
to stop for now, or complete_task when done. Run project commands in the sandbox with
execute_in_task, never on the host; paths are relative to the task workspace (/workspace)."""
