FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/sluice --create-home sluice
WORKDIR /srv/sluice
COPY pyproject.toml README.md gunicorn.conf.py ./
COPY app app
COPY workers workers
COPY migrations migrations
RUN pip install --no-cache-dir .
ENV SLUICE_HOME=/var/lib/sluice
USER sluice
EXPOSE 8000
CMD ["sluice", "web"]
