package cape.sdk;

import cape.errors.FormatException;
import cape.errors.RequestRefusedException;
import cape.errors.TransportException;
import com.google.gson.JsonElement;
import java.io.IOException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.Map;

/** The REST half of the protocol (mirrors {@code cape.sdk.rest.RestClient}). */
final class Rest {
    static final Duration TIMEOUT = Duration.ofSeconds(30);

    private final String url;
    private final HttpClient http;

    Rest(String url, HttpClient http) {
        if (!url.startsWith("https://")) {
            int colon = url.indexOf(':');
            throw new FormatException("the server URL must use https://, not "
                    + (colon < 0 ? url : url.substring(0, colon)) + "://");
        }
        this.url = url.replaceAll("/+$", "");
        this.http = http;
    }

    /** The {@code error} (or {@code message}) of a JSON refusal body, at most 300 characters;
     * {@code null} when the body is not a JSON object. */
    static String refusalText(String body) {
        JsonElement parsed = Json.parse(body == null || body.isEmpty() ? "{}" : body);
        if (parsed == null || !parsed.isJsonObject()) {
            return null;
        }
        JsonElement error = parsed.getAsJsonObject().get("error");
        JsonElement message = parsed.getAsJsonObject().get("message");
        String text = Json.truthy(error) ? Json.str(error) : Json.truthy(message) ? Json.str(message) : "";
        return text.length() > 300 ? text.substring(0, 300) : text;
    }

    /** A refusal, with the re-login hint when the server says the token expired. */
    static RequestRefusedException refused(String message, String text, int status) {
        if (text.contains("token is expired")) {
            message += "; log in again";
        }
        return new RequestRefusedException(message, status);
    }

    /** A JSON call; the parsed JSON answer, or the raw bytes of a non-JSON success. */
    Object request(String method, String path, Map<String, ?> body, String token) {
        HttpRequest.Builder request;
        try {
            request = HttpRequest.newBuilder(URI.create(url + path)).timeout(TIMEOUT);
        } catch (IllegalArgumentException e) {
            throw new FormatException("not a valid request URL: " + url + path);
        }
        if (token != null) {
            request.header("Authorization", "Bearer " + token);
        }
        if (body != null) {
            request.header("Content-Type", "application/json");
            request.method(method, HttpRequest.BodyPublishers.ofString(Json.write(body)));
        } else {
            request.method(method, HttpRequest.BodyPublishers.noBody());
        }
        HttpResponse<byte[]> response;
        try {
            response = http.send(request.build(), HttpResponse.BodyHandlers.ofByteArray());
        } catch (IOException e) {
            throw new TransportException("cannot reach the Cape server at " + url + ": " + e.getMessage());
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new TransportException("interrupted while calling " + url);
        }
        int status = response.statusCode();
        String text = new String(response.body(), StandardCharsets.UTF_8);
        if (status >= 200 && status < 300) {
            String type = response.headers().firstValue("content-type").orElse("");
            if (type.startsWith("application/json")) {
                JsonElement parsed = Json.parse(text);
                if (parsed == null) {
                    throw new FormatException("the server's answer to " + path + " is not JSON");
                }
                return parsed;
            }
            return response.body();
        }
        String refusal = refusalText(text);
        if (refusal == null) {
            refusal = text.length() > 200 ? text.substring(0, 200) : text;
        }
        throw refused((refusal.isEmpty() ? "request failed" : refusal) + " (HTTP " + status + ")",
                refusal, status);
    }
}
