// covid-cxr web page: upload an X-ray, show the triage result and a Grad-CAM heatmap blended in a canvas.
// Plain JavaScript, no dependencies. Talks to the public API only, with relative URLs (so a reverse proxy's
// path prefix works). The image and its file name never go into a URL, storage or a log: the upload is sent
// under a neutral name, images are held as in-memory bitmaps, and only the API key goes into sessionStorage.
"use strict";

(() => {
  const KEY_STORAGE = "covid-cxr.api-key";
  const DEFAULT_KEY_HEADER = "X-API-Key";
  const READY_POLL_MS = 5000;

  // A heading for each refusal code the service sends; the sentence under it is the server's own `detail`.
  const REFUSAL_TITLES = {
    unsupported_format: "This file is not an image the service can read",
    empty_file: "The file is empty",
    truncated_image: "The image could not be read",
    corrupt_image: "The image could not be read",
    undecodable_image: "The image could not be read",
    file_too_large: "The file is too large",
    too_many_pixels: "The image is too large",
    multiframe_dicom: "This DICOM file has more than one frame",
    dicom_without_pixels: "This DICOM file holds no image",
    unsupported_dicom: "This DICOM file cannot be read",
    not_a_chest_xray: "This does not look like a chest X-ray",
    not_ready: "The service is not ready",
    unauthorized: "The API key was not accepted",
    network_error: "The service could not be reached",
    too_many_files: "One file at a time",
  };
  const DEFAULT_REFUSAL_TITLE = "The image was refused";

  const state = {
    config: null,
    apiKey: sessionStorage.getItem(KEY_STORAGE),
    busy: false,
    generation: 0, // bumped by every upload and clear, so late answers for an old image are dropped
    result: null,
    image: null, // ImageBitmap of the plain image
    heatmaps: new Map(), // target class -> ImageBitmap of its colour map (same size as the image)
    target: null,
    modelCard: null,
  };

  const $ = (id) => document.getElementById(id);

  class ApiError extends Error {
    constructor(status, code, detail) {
      super(detail);
      this.status = status;
      this.code = code;
      this.detail = detail;
    }
  }

  function keyHeaders() {
    const header = (state.config && state.config.api_key_header) || DEFAULT_KEY_HEADER;
    return state.apiKey ? { [header]: state.apiKey } : {};
  }

  // fetch() with the API key, turning every failure into an ApiError carrying the server's sentence.
  async function api(path, options = {}) {
    let response;
    try {
      response = await fetch(path, {
        ...options,
        headers: { ...keyHeaders(), ...(options.headers || {}) },
        cache: "no-store",
        credentials: "same-origin",
      });
    } catch (err) {
      throw new ApiError(0, "network_error",
        "The service could not be reached. Check the network connection and try again.");
    }
    if (!response.ok) {
      let body = null;
      try {
        body = await response.json();
      } catch (err) {
        body = null;
      }
      const detail = body && typeof body.detail === "string" ? body.detail
        : `The service answered with HTTP status ${response.status}.`;
      const code = body && typeof body.code === "string" ? body.code : `http_${response.status}`;
      throw new ApiError(response.status, code, detail);
    }
    return response;
  }

  // ---- formatting -----------------------------------------------------------------------------------------

  function percent(p) {
    if (p > 0 && p < 0.001) return "< 0.1 %";
    return `${(p * 100).toFixed(1)} %`;
  }

  function decimal(x, digits = 3) {
    return typeof x === "number" && Number.isFinite(x) ? x.toFixed(digits) : "–";
  }

  // The same wording as the service's own sentence (three significant digits: "1.95 KiB", "20 MiB").
  function formatBytes(n) {
    if (n < 1024) return `${n} bytes`;
    const [size, unit] = n < 1024 * 1024 ? [n / 1024, "KiB"] : [n / (1024 * 1024), "MiB"];
    return `${parseFloat(size.toPrecision(3))} ${unit}`;
  }

  function milliseconds(ms) {
    return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
  }

  function element(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = text;
    if (className) node.className = className;
    return node;
  }

  // ---- views and banners ----------------------------------------------------------------------------------

  function showView() {
    const about = window.location.hash === "#about";
    $("view-triage").hidden = about;
    $("view-about").hidden = !about;
    const [current, other] = about ? [$("nav-about"), $("nav-triage")] : [$("nav-triage"), $("nav-about")];
    current.setAttribute("aria-current", "page");
    other.removeAttribute("aria-current");
  }

  function setServiceStatus(text) {
    $("service-status").textContent = text || "";
    $("service-status").hidden = !text;
  }

  function setDisclaimer(text) {
    if (typeof text !== "string" || !text) return;
    // The banner already starts with "Research use only."; do not say it twice.
    $("disclaimer-text").textContent = text.replace(/^\s*Research use only\.\s*/i, "");
  }

  function showRefusal(error) {
    $("refusal-title").textContent = REFUSAL_TITLES[error.code] || DEFAULT_REFUSAL_TITLE;
    $("refusal-detail").textContent = error.detail || String(error);
    $("refusal").dataset.code = error.code || "";
    $("refusal").hidden = false;
  }

  function hideRefusal() {
    $("refusal").hidden = true;
    $("refusal").dataset.code = "";
  }

  function uploadAllowed() {
    const needsKey = state.config && state.config.api_key_required && !state.apiKey;
    return !state.busy && !needsKey;
  }

  function refreshUploadControls() {
    const allowed = uploadAllowed();
    $("choose-file").disabled = !allowed;
    $("drop-zone").classList.toggle("is-disabled", !allowed);
  }

  function setBusy(busy, text) {
    state.busy = busy;
    $("busy").textContent = busy ? text : "";
    $("upload-section").setAttribute("aria-busy", busy ? "true" : "false");
    refreshUploadControls();
  }

  // ---- API key --------------------------------------------------------------------------------------------

  function askForKey(message) {
    state.apiKey = null;
    sessionStorage.removeItem(KEY_STORAGE);
    $("key-section").hidden = false;
    $("key-error").textContent = message || "";
    $("key-error").hidden = !message;
    refreshUploadControls();
    $("key-input").focus();
  }

  async function submitKey(event) {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) {
      $("key-error").textContent = "Enter the API key you were given.";
      $("key-error").hidden = false;
      return;
    }
    state.apiKey = key;
    try {
      await loadModelCard();
    } catch (err) {
      if (err.status === 401) {
        askForKey(`That key was not accepted. ${err.detail}`);
        return;
      }
      // Anything else (e.g. 503, not ready) means the key itself passed: keys are checked first.
      $("about-status").textContent = `The model card could not be loaded. ${err.detail}`;
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    $("key-input").value = "";
    $("key-section").hidden = true;
    $("key-error").hidden = true;
    refreshUploadControls();
    $("choose-file").focus();
  }

  // ---- upload and result ----------------------------------------------------------------------------------

  async function analyse(file) {
    if (!uploadAllowed()) return;
    hideRefusal();
    const generation = ++state.generation;
    setBusy(true, "Analysing the image…");
    const started = performance.now();
    let body;
    try {
      const limit = state.config ? state.config.max_upload_bytes : null;
      if (limit && file.size > limit) {
        throw new ApiError(413, "file_too_large",
          `The file is larger than the upload limit of ${formatBytes(limit)}.`);
      }
      const form = new FormData();
      form.append("file", file, "upload"); // the real file name stays in the browser
      const response = await api("predict", { method: "POST", body: form });
      body = await response.json();
    } catch (err) {
      if (generation === state.generation) {
        if (err.status === 401) askForKey(err.detail);
        showRefusal(err);
      }
      return;
    } finally {
      if (generation === state.generation) setBusy(false);
    }
    if (generation !== state.generation) return;
    showResult(body, performance.now() - started);
    loadExplanation(body, generation);
  }

  function sentence(text) {
    const trimmed = text.trim();
    return /[.!?]$/.test(trimmed) ? trimmed : `${trimmed}.`;
  }

  // The bundle's decision rule when the response carries one ({positive_class, threshold, positive, rule}),
  // else the most probable class.
  function decisionOf(body) {
    const decision = body.decision;
    const mostProbable = body.argmax_label || body.label;
    if (decision && typeof decision.positive === "boolean" && decision.positive_class) {
      const cls = decision.positive_class;
      const rule = typeof decision.rule === "string" && decision.rule ? decision.rule
        : `${cls} suspected when its probability is at least ${percent(decision.threshold)}`;
      return {
        text: decision.positive ? `${cls} suspected` : `${cls} not suspected`,
        positive: decision.positive,
        note: `Rule: ${sentence(rule)} Most probable class: ${mostProbable}.`,
      };
    }
    return {
      text: `Most probable class: ${mostProbable}`,
      positive: null,
      note: "This model has no triage rule, so the page shows its most probable class.",
    };
  }

  function showResult(body, elapsedMs) {
    state.result = body;
    setDisclaimer(body.disclaimer);

    const decision = decisionOf(body);
    const decisionNode = $("decision");
    decisionNode.textContent = decision.text;
    decisionNode.classList.toggle("is-positive", decision.positive === true);
    decisionNode.classList.toggle("is-negative", decision.positive === false);
    $("decision-note").textContent = decision.note;

    const list = $("probabilities");
    list.replaceChildren();
    const probabilities = body.probabilities || {};
    for (const [name, p] of Object.entries(probabilities)) {
      const item = element("li");
      item.dataset.class = name;
      if (name === (body.argmax_label || body.label)) item.classList.add("is-top");
      const label = element("span", name, "bar-label");
      const track = element("span", null, "bar-track");
      track.setAttribute("aria-hidden", "true");
      const fill = element("span", null, "bar-fill");
      fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
      track.append(fill);
      const value = element("span", percent(p), "bar-value");
      item.append(label, track, value);
      list.append(item);
    }

    const model = body.model || {};
    const sha = typeof model.sha256 === "string" ? model.sha256.slice(0, 12) : "";
    $("result-model").textContent = `${model.name || "?"} version ${model.version || "?"} (${model.arch || "?"}), sha ${sha}`;
    const timing = body.timing_ms || {};
    const server = typeof timing.total === "number" ? `${milliseconds(timing.total)} in the service, ` : "";
    $("result-time").textContent = `${server}${milliseconds(elapsedMs)} including the upload`;
    const input = body.input || {};
    $("result-input").textContent = `${String(input.format || "").toUpperCase()}, ${input.width} × ${input.height} pixels`;

    buildTargetSwitch(Object.keys(probabilities), body.label);
    $("result").hidden = false;
    $("result").focus();
  }

  function clearResult() {
    state.generation += 1;
    state.result = null;
    state.image = null;
    state.heatmaps.clear();
    state.target = null;
    $("result").hidden = true;
    $("probabilities").replaceChildren();
    $("target-options").replaceChildren();
    const canvas = $("explain-canvas");
    canvas.width = 1;
    canvas.height = 1;
    delete canvas.dataset.rendered;
    hideRefusal();
    $("choose-file").focus();
  }

  // ---- explanation ----------------------------------------------------------------------------------------

  function buildTargetSwitch(classes, selected) {
    const options = $("target-options");
    options.replaceChildren();
    classes.forEach((name, index) => {
      const label = element("label");
      const radio = element("input");
      radio.type = "radio";
      radio.name = "target";
      radio.value = name;
      radio.id = `target-${index}`;
      radio.checked = name === selected;
      radio.disabled = !$("show-heatmap").checked;
      radio.addEventListener("change", () => {
        if (radio.checked) selectTarget(name);
      });
      label.htmlFor = radio.id;
      label.append(radio, document.createTextNode(name));
      options.append(label);
    });
    state.target = selected;
  }

  async function fetchLayer(id, layer, target) {
    const params = new URLSearchParams({ id, layer });
    if (target) params.set("target", target);
    const response = await api(`explain?${params.toString()}`);
    return createImageBitmap(await response.blob());
  }

  async function loadExplanation(body, generation) {
    $("explain-status").textContent = "Computing the heatmap…";
    try {
      const [image, heatmap] = await Promise.all([
        fetchLayer(body.id, "image"),
        fetchLayer(body.id, "heatmap", body.label),
      ]);
      if (generation !== state.generation) return;
      state.image = image;
      state.heatmaps.set(body.label, heatmap);
      $("explain-status").textContent = "";
      draw();
    } catch (err) {
      if (generation !== state.generation) return;
      explanationFailed(err);
    }
  }

  function explanationFailed(err) {
    if (err.status === 401) askForKey(err.detail);
    const why = err.status === 404 ? "This result has expired; upload the image again to see its heatmap."
      : err.detail;
    $("explain-status").textContent = `The heatmap could not be shown. ${why}`;
  }

  async function selectTarget(name) {
    state.target = name;
    if (!state.result) return;
    if (state.heatmaps.has(name)) {
      draw();
      return;
    }
    const generation = state.generation;
    $("explain-status").textContent = `Computing the heatmap of ${name}…`;
    try {
      const heatmap = await fetchLayer(state.result.id, "heatmap", name);
      if (generation !== state.generation) return;
      state.heatmaps.set(name, heatmap);
      if (state.target === name) {
        $("explain-status").textContent = "";
        draw();
      }
    } catch (err) {
      if (generation === state.generation) explanationFailed(err);
    }
  }

  function opacity() {
    return Number($("opacity").value) / 100;
  }

  // Plain image, then the heatmap on top at the slider's opacity: (1 - a) * image + a * heatmap, which is
  // exactly what GET /explain?layer=overlay&alpha=a renders on the server.
  function draw() {
    const image = state.image;
    if (!image) return;
    const canvas = $("explain-canvas");
    if (canvas.width !== image.width || canvas.height !== image.height) {
      canvas.width = image.width;
      canvas.height = image.height;
    }
    const context = canvas.getContext("2d");
    context.globalAlpha = 1;
    context.drawImage(image, 0, 0);
    const show = $("show-heatmap").checked;
    const heatmap = state.heatmaps.get(state.target);
    const alpha = opacity();
    const drawn = show && heatmap && alpha > 0;
    if (drawn) {
      context.globalAlpha = alpha;
      context.drawImage(heatmap, 0, 0, canvas.width, canvas.height);
      context.globalAlpha = 1;
    }
    canvas.setAttribute("aria-label", drawn
      ? `The X-ray with the heatmap of ${state.target} at ${Math.round(alpha * 100)} % opacity.`
      : "The X-ray without a heatmap.");
    // For tests and assistive tooling: what the canvas shows now.
    canvas.dataset.rendered = drawn ? `${state.target}@${Math.round(alpha * 100)}` : "image";
  }

  function onOpacityInput() {
    $("opacity-value").textContent = `${$("opacity").value} %`;
    draw();
  }

  function onToggleHeatmap() {
    const show = $("show-heatmap").checked;
    $("opacity").disabled = !show;
    for (const radio of $("target-options").querySelectorAll("input")) radio.disabled = !show;
    draw();
  }

  // ---- the model page -------------------------------------------------------------------------------------

  async function loadModelCard() {
    const card = await (await api("model")).json();
    state.modelCard = card;
    renderModelCard(card);
    return card;
  }

  function addFact(list, term, value) {
    if (value === undefined || value === null || value === "") return;
    list.append(element("dt", term), element("dd", String(value)));
  }

  function splitTotals(counts) {
    const totals = {};
    for (const [split, perClass] of Object.entries(counts || {})) {
      if (perClass && typeof perClass === "object") {
        totals[split] = Object.values(perClass).reduce((a, b) => a + (typeof b === "number" ? b : 0), 0);
      }
    }
    return totals;
  }

  function perSourceMetrics(card) {
    const metrics = card.metrics || {};
    return metrics.per_source || metrics.by_source || card.per_source || null;
  }

  function renderModelCard(card) {
    setDisclaimer(card.disclaimer);
    const training = card.training || {};
    const data = training.data || {};
    const metrics = card.metrics || {};
    const classes = Array.isArray(card.classes) ? card.classes : [];

    $("about-summary").textContent =
      `${card.name} version ${card.version} is a ${card.arch} image classifier that sorts a chest X-ray into ` +
      `one of ${classes.length} classes: ${classes.join(", ")}. It gives a probability for each class and a ` +
      "Grad-CAM heatmap of the regions behind each score. It supports triage research; it does not diagnose.";

    const facts = $("about-facts");
    facts.replaceChildren();
    addFact(facts, "Classes (output order)", classes.join(", "));
    addFact(facts, "Network", card.arch);
    addFact(facts, "Input", `${card.input_size} × ${card.input_size} pixels (${card.preprocessing})`);
    if (card.decision && card.decision.positive_class) {
      const threshold = typeof card.decision.threshold === "number" ? ` at ${percent(card.decision.threshold)}` : "";
      addFact(facts, "Triage rule", card.decision.rule || `${card.decision.positive_class} suspected${threshold}`);
      // What the rule gave on each held-out hospital when its threshold was chosen without that hospital.
      const estimate = card.decision.leave_one_source_out;
      if (estimate && typeof estimate.sensitivity === "number" && typeof estimate.specificity === "number") {
        const sources = Object.keys(estimate.per_source || {}).length;
        addFact(facts, "Triage rule on hospitals it was not chosen on",
          `sensitivity ${percent(estimate.sensitivity)}, specificity ${percent(estimate.specificity)} ` +
          `(${sources} sources, each scored at the threshold chosen on the others)`);
      }
    }
    addFact(facts, "Calibration temperature", typeof card.temperature === "number" ? card.temperature.toFixed(3) : null);
    const totals = splitTotals(data.counts);
    const totalText = Object.entries(totals).map(([split, n]) => `${n} ${split}`).join(", ");
    addFact(facts, "Training data", [data.dataset, totalText && `(${totalText} images)`].filter(Boolean).join(" "));
    if (typeof training.imagenet_weights === "boolean") {
      addFact(facts, "Started from ImageNet weights", training.imagenet_weights ? "yes" : "no");
    }
    addFact(facts, "Created", card.created_at);
    const onnx = card.sha256 && card.sha256["model.onnx"];
    addFact(facts, "Model file sha256", onnx);
    addFact(facts, "Source commit", card.git_commit);

    const summary = [];
    if (typeof metrics.n === "number") summary.push(`${metrics.n} held-out ${metrics.split || "test"} images`);
    if (typeof metrics.accuracy === "number") summary.push(`accuracy ${percent(metrics.accuracy)}`);
    if (typeof metrics.macro_f1 === "number") summary.push(`macro-F1 ${decimal(metrics.macro_f1)}`);
    if (metrics.scored_with) summary.push(`scored with ${metrics.scored_with}`);
    $("about-metrics-summary").textContent = summary.length
      ? `On ${summary.join(", ")}.` : "This model card has no measured figures.";

    const perClassBody = $("about-per-class").querySelector("tbody");
    perClassBody.replaceChildren();
    const perClass = metrics.per_class || {};
    for (const name of classes.length ? classes : Object.keys(perClass)) {
      const m = perClass[name];
      if (!m) continue;
      const row = element("tr");
      const head = element("th", name);
      head.scope = "row";
      row.append(head);
      for (const value of [m.recall, m.specificity, m.precision, m.f1, m.roc_auc]) {
        row.append(element("td", decimal(value)));
      }
      row.append(element("td", typeof m.support === "number" ? String(m.support) : "–"));
      perClassBody.append(row);
    }
    $("about-per-class").hidden = perClassBody.children.length === 0;

    const perSource = perSourceMetrics(card);
    const sourceBody = $("about-per-source").querySelector("tbody");
    sourceBody.replaceChildren();
    if (perSource && typeof perSource === "object") {
      for (const [source, m] of Object.entries(perSource)) {
        if (!m || typeof m !== "object") continue;
        const row = element("tr");
        const head = element("th", source);
        head.scope = "row";
        row.append(head, element("td", typeof m.n === "number" ? String(m.n) : "–"),
          element("td", typeof m.accuracy === "number" ? percent(m.accuracy) : "–"),
          element("td", decimal(m.macro_f1)));
        sourceBody.append(row);
      }
    }
    $("about-per-source").hidden = sourceBody.children.length === 0;

    const limits = $("about-limits");
    limits.replaceChildren();
    const statements = [
      "Research use only: it is not a medical device and its output is never a diagnosis.",
      `The figures come from one held-out part of the training collection${data.dataset ? ` (${data.dataset})` : ""}. ` +
        "They do not show how the model does on images from another hospital, scanner or population.",
      `It only knows the classes above: an X-ray with any other finding still gets one of ${classes.join(", ")}.`,
      card.gate ? "Images that do not look like a chest X-ray are refused before they are scored."
        : "It does not check that an image is a chest X-ray: any picture gets a score.",
      "The heatmap shows which regions drove a score, not where a lesion is.",
    ];
    for (const key of ["limitations", "limits"]) {
      const extra = card[key];
      if (typeof extra === "string") statements.push(extra);
      else if (Array.isArray(extra)) statements.push(...extra.filter((s) => typeof s === "string"));
    }
    for (const statement of statements) limits.append(element("li", statement));

    $("about-status").hidden = true;
    $("about-content").hidden = false;
  }

  async function loadModelCardForPage() {
    try {
      await loadModelCard();
    } catch (err) {
      if (err.status === 401) askForKey(err.detail);
      $("about-status").textContent = `The model card could not be loaded. ${err.detail}`;
      $("about-status").hidden = false;
    }
  }

  // ---- readiness ------------------------------------------------------------------------------------------

  async function checkReady() {
    try {
      await api("readyz");
      setServiceStatus("");
      return true;
    } catch (err) {
      setServiceStatus(`The service is not ready: ${err.detail}`);
      window.setTimeout(async () => {
        if (await checkReady()) loadModelCardForPage();
      }, READY_POLL_MS);
      return false;
    }
  }

  // ---- wiring ---------------------------------------------------------------------------------------------

  function bindDropZone() {
    const zone = $("drop-zone");
    // A file dropped anywhere else must not make the browser open it (its path would land in the URL bar).
    for (const type of ["dragover", "drop"]) window.addEventListener(type, (event) => event.preventDefault());
    zone.addEventListener("dragenter", (event) => {
      event.preventDefault();
      if (uploadAllowed()) zone.classList.add("is-dragging");
    });
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      if (event.dataTransfer) event.dataTransfer.dropEffect = uploadAllowed() ? "copy" : "none";
    });
    zone.addEventListener("dragleave", (event) => {
      if (!zone.contains(event.relatedTarget)) zone.classList.remove("is-dragging");
    });
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("is-dragging");
      const files = event.dataTransfer ? event.dataTransfer.files : null;
      if (!files || files.length === 0) return;
      if (files.length > 1) {
        showRefusal(new ApiError(0, "too_many_files", "Drop one image at a time."));
        return;
      }
      analyse(files[0]);
    });
  }

  function bind() {
    window.addEventListener("hashchange", showView);
    $("key-form").addEventListener("submit", submitKey);
    $("choose-file").addEventListener("click", () => $("file-input").click());
    $("file-input").addEventListener("change", () => {
      const input = $("file-input");
      const file = input.files && input.files[0];
      input.value = ""; // so choosing the same file again still triggers a change
      if (file) analyse(file);
    });
    bindDropZone();
    $("opacity").addEventListener("input", onOpacityInput);
    $("show-heatmap").addEventListener("change", onToggleHeatmap);
    $("clear-result").addEventListener("click", clearResult);
  }

  async function start() {
    bind();
    showView();
    refreshUploadControls();
    try {
      state.config = await (await api("page/config")).json();
    } catch (err) {
      setServiceStatus(`The service could not be reached: ${err.detail}`);
      return;
    }
    refreshUploadControls();
    const ready = await checkReady();
    if (state.config.api_key_required && !state.apiKey) {
      askForKey();
      return;
    }
    if (ready) loadModelCardForPage();
  }

  start();
})();
