// Swagger UI served from our own static files (no CDN, no inline script: the CSP forbids both).
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true });
});
