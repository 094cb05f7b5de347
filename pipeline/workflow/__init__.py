"""Migration workflow files: what to migrate, how, and where to publish it."""

from pipeline.workflow.load import Destination, Source, Verify, Workflow, WorkflowError, load_workflow, schema

__all__ = ["Destination", "Source", "Verify", "Workflow", "WorkflowError", "load_workflow", "schema"]
