defmodule Quichex.Native do
  @moduledoc false
  # NIF stubs over native/quichex_nif. Every function validates its
  # arguments in Rust and returns {:ok, _} | {:error, reason}, or raises
  # ArgumentError when an argument cannot even be decoded.

  @on_load :load_nif

  @doc false
  def load_nif do
    path = :filename.join(:code.priv_dir(:quichex), ~c"native/libquichex_nif")

    case :erlang.load_nif(path, 0) do
      :ok ->
        :ok

      {:error, {:reload, _}} ->
        :ok

      {:error, reason} ->
        IO.warn("quichex: could not load the NIF at #{path}: #{inspect(reason)}")
        :ok
    end
  end

  defp err, do: :erlang.nif_error(:nif_not_loaded)

  # config
  def config_build(_opts), do: err()
  def config_describe(_config), do: err()
  def quiche_version, do: err()

  # connection
  def connection_connect(_config, _server_name, _scid, _local, _peer, _window, _session),
    do: err()

  def connection_accept(_config, _scid, _odcid, _local, _peer, _window, _reset_token),
    do: err()

  def connection_close(_conn, _app?, _code, _reason), do: err()
  def connection_stats(_conn), do: err()
  def connection_info(_conn), do: err()
  # Connection resources alive in the VM (for leak tests).
  def connection_live_count, do: err()

  # driver
  def connection_poll(_conn, _packets, _to, _timer?, _credits, _commands), do: err()
  def connection_flush(_conn, _writes, _dgrams, _max_packets), do: err()

  # streams
  def connection_stream_open(_conn, _id, _urgency, _incremental?), do: err()
  def connection_stream_priority(_conn, _id, _urgency, _incremental?), do: err()
  def connection_writable_streams(_conn, _ids), do: err()

  # paths and connection IDs
  def connection_new_scids(_conn, _cids, _retire?), do: err()
  def connection_probe_path(_conn, _local, _peer), do: err()
  def connection_migrate(_conn, _local, _peer), do: err()
  def connection_paths(_conn), do: err()

  # packets
  def packet_header(_data, _dcid_len), do: err()
  def packet_negotiate_version(_scid, _dcid), do: err()
  def packet_retry(_scid, _dcid, _new_scid, _token, _version), do: err()
  def packet_version_supported(_version), do: err()
end
