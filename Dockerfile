# The Airflow image (Astro runtime layout: dags/, include/, plugins/ under /usr/local/airflow).
# Build: docker build -t vloop-airflow .
# torch is installed first, from the index named by TORCH_INDEX_URL (a CPU wheel index for
# Airflow workers; the GPU training image is training/Dockerfile).
FROM apache/airflow:3.3.2-python3.11
ARG TORCH_INDEX_URL
WORKDIR /usr/local/airflow
COPY --chown=airflow:root requirements.txt requirements/ ./requirements/
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url $TORCH_INDEX_URL} -r requirements/torch.txt \
 && pip install --no-cache-dir -r requirements/requirements.txt -c requirements/constraints.txt
COPY --chown=airflow:root pyproject.toml README.md ./
COPY --chown=airflow:root include/ include/
COPY --chown=airflow:root training/ training/
COPY --chown=airflow:root serving/ serving/
RUN pip install --no-cache-dir --no-deps -e .
COPY --chown=airflow:root dags/ dags/
COPY --chown=airflow:root plugins/ plugins/
COPY --chown=airflow:root airflow_settings.yaml ./
ENV AIRFLOW__CORE__DAGS_FOLDER=/usr/local/airflow/dags \
    AIRFLOW__CORE__PLUGINS_FOLDER=/usr/local/airflow/plugins \
    AIRFLOW__CORE__LOAD_EXAMPLES=False
