FROM python:3.11-slim
WORKDIR /srv/sluice
COPY pyproject.toml README.md ./
COPY app app
COPY workers workers
COPY migrations migrations
RUN pip install --no-cache-dir .
ENV SLUICE_HOME=/var/lib/sluice
EXPOSE 8000
CMD ["gunicorn", "-k", "gevent", "--workers", "2", "--worker-connections", "10000", "--bind", "0.0.0.0:8000", "app:create_app()"]
