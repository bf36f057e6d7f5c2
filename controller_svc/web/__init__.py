"""The web console: the controller's pages for people, served over HTTPS by the controller
process itself (``controller-svc serve --http HOST:PORT``).

    app.py          build_app(): the Starlette application, its routes and middleware
    serve.py        ConsoleServer: uvicorn in a thread, on a SO_REUSEPORT socket
    session.py      the signed session cookie's contents, the CSRF token, the secret file
    auth.py         logging in and out, and ``guarded``: who may open a page or post a form
    console.py      Console: the domain services the pages use, and their audit rows
    pages.py        templates (Jinja2, autoescaped), release notes from Markdown
    maintenance.py  Settings → Maintenance, the upgrade plan, starting an upgrade
    jobs.py         jobs, rejected management jobs, a job live (server-sent events)
    releases.py     releases and their notes
    admins.py       the admins the notifier emails

The pages use the same domain services as the gRPC API (the job engine's plan and
start_upgrade, Trust's signing state, Admins, Rejections, the Audit log), follow the role
rules of the gRPC methods they stand for (``access.role_needed``), and show the same
messages. Every action is an audit row with the actor ``user:NAME``.
"""
