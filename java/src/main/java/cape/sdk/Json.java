package cape.sdk;

import cape.errors.FormatException;
import com.google.gson.Gson;
import com.google.gson.JsonArray;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import com.google.gson.JsonPrimitive;
import com.google.gson.TypeAdapter;
import com.google.gson.stream.JsonReader;
import com.google.gson.stream.JsonToken;
import java.io.IOException;
import java.io.StringReader;
import java.util.Base64;
import java.util.Map;
import java.util.stream.Collectors;

/** JSON as the Python SDK reads it (Gson, strict), and the checks every frame field gets. */
final class Json {
    private static final TypeAdapter<JsonElement> ELEMENTS = new Gson().getAdapter(JsonElement.class);

    private Json() {}

    /** Parse one JSON value, strictly; {@code null} when the text is not JSON (however deep). */
    static JsonElement parse(String text) {
        try {
            JsonReader reader = new JsonReader(new StringReader(text));
            reader.setLenient(false);
            JsonElement element = ELEMENTS.read(reader);
            if (reader.peek() != JsonToken.END_DOCUMENT) {
                return null;
            }
            return element;
        } catch (IOException | RuntimeException | StackOverflowError e) {
            return null;
        }
    }

    static String write(Map<String, ?> object) {
        return new Gson().toJson(object);
    }

    /** Python's truthiness of a JSON value (for {@code if parsed.get("error")}). */
    static boolean truthy(JsonElement value) {
        if (value == null || value.isJsonNull()) {
            return false;
        }
        if (value instanceof JsonPrimitive p) {
            if (p.isBoolean()) {
                return p.getAsBoolean();
            }
            if (p.isNumber()) {
                return p.getAsDouble() != 0;
            }
            return !p.getAsString().isEmpty();
        }
        if (value instanceof JsonArray a) {
            return !a.isEmpty();
        }
        return ((JsonObject) value).size() != 0;
    }

    /** A JSON string's text, or {@code null} if the value is not a string. */
    static String string(JsonElement value) {
        return value instanceof JsonPrimitive p && p.isString() ? p.getAsString() : null;
    }

    /** {@code str(value)} as Python prints a JSON value: strings as they are. */
    static String str(JsonElement value) {
        String text = string(value);
        return text != null ? text : repr(value);
    }

    /** {@code repr(value)} as Python prints a JSON value in messages ({@code 'x'}, None, [..]). */
    static String repr(JsonElement value) {
        if (value == null || value.isJsonNull()) {
            return "None";
        }
        if (value instanceof JsonPrimitive p) {
            if (p.isString()) {
                return "'" + p.getAsString() + "'";
            }
            if (p.isBoolean()) {
                return p.getAsBoolean() ? "True" : "False";
            }
            return p.getAsString();
        }
        if (value instanceof JsonArray a) {
            StringBuilder out = new StringBuilder("[");
            for (int i = 0; i < a.size(); i++) {
                out.append(i == 0 ? "" : ", ").append(repr(a.get(i)));
            }
            return out.append(']').toString();
        }
        return ((JsonObject) value).entrySet().stream()
                .map(e -> "'" + e.getKey() + "': " + repr(e.getValue()))
                .collect(Collectors.joining(", ", "{", "}"));
    }

    /** Strict standard base64 (padding required), or a {@link FormatException} naming {@code what}. */
    static byte[] b64(JsonElement value, String what) {
        String text = string(value);
        if (text == null) {
            throw new FormatException("the " + what + " is missing");
        }
        return b64(text, what);
    }

    static byte[] b64(String text, String what) {
        if (text.length() % 4 != 0) {
            throw new FormatException("the " + what + " is not valid base64");
        }
        try {
            return Base64.getDecoder().decode(text);
        } catch (IllegalArgumentException e) {
            throw new FormatException("the " + what + " is not valid base64");
        }
    }

    static String b64(byte[] data) {
        return Base64.getEncoder().encodeToString(data);
    }
}
