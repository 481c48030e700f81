# gunicorn configuration for examples/flask/app.py.
#
# post_worker_init starts every replicast.Subscriber the app created, in each
# worker, once the app is loaded (and, with -k gevent, after gevent patched
# the worker); worker_exit stops them. Nothing gRPC runs in the master.
from replicast.gunicorn import post_worker_init, worker_exit  # noqa: F401

workers = 3
# A worker busy with one request must not make the others' probes wait.
timeout = 30
graceful_timeout = 5
accesslog = None
# gunicorn 27's control socket defaults to one path per user; three apps on
# one machine (the check) would share it. A pod has one app: keep it there.
control_socket_disable = True
