"""Evaluation for InternVL chat models: benchmark scoring with the official definitions, held-out sets, eval scripts.

``eval.metrics``  the scoring library: one function per metric (``vqa_acc``, ``anls``, ``relaxed_acc``,
                  ``exact_match``, ``mc_acc``, ``yesno``, ``iou_acc``) behind ``eval.metrics.compute``. By default
                  every metric reproduces the number the official ``internvl_chat/eval`` scripts print, quirks
                  included (each quirk is documented next to its metric); ``textbook=True`` fixes them.
``eval.score``    the command line over the library: ``python -m eval.score --metric NAME --pred FILE``.

Importing this package has no side effects and needs neither torch nor a model.
"""
