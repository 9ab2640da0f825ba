"""Pieces shared by several strategies, which are not strategies themselves.

* ``task_gradient_tree``: params-shaped per-task state (MoCo, DB-MTL,
  ExcessMTL);
* ``double_sampling``: the three-minibatch step of MoDo and SDMGrad;
* ``gradient_surgery``: the projection loop of PCGrad and GradVac and their
  random visiting orders;
* ``loss_history``: the loss averages, ratios and weight finishing of the
  loss weightings (EMA, REMA, DWEMA, DWA, LBTW, initial loss, ...).
"""
