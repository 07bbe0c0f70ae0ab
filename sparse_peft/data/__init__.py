from sparse_peft.data.glue import GLUE_TASKS, GlueTask, get_task, load_glue, read_glue_file  # noqa: F401
from sparse_peft.data.loaders import TaskData, build_task_data, eval_loader, eval_loaders, lengths, make_loader, subset, train_order  # noqa: F401
